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
import re
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
/* A placeholder grows to fit its message rather than clip it, and breaks lines between words only:
   a word wider than the box widens the box (and its cell) instead of being cut in two. */
.missing { width: 118px; min-width: min-content; min-height: 118px; padding: 6px; border: 2px dashed #999;
           font-size: 11px; color: #333; background: #fafafa; overflow-wrap: normal; word-break: normal;
           hyphens: manual; }
.missing .word { white-space: nowrap; }
figure.cell { min-width: min-content; }
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
figure.cell.keep { border-color: var(--same); }
figure.cell.remove { border-color: var(--other); border-style: dashed; }
.mark.keep { color: var(--same); }
.mark.remove { color: var(--other); }
.tag.exact { border-color: #0b5cad; color: #0b5cad; }
.letter + .mark { display: inline; }
.letter { display: inline-block; min-width: 1.3em; padding: 0 3px; margin-right: 2px; border-radius: 3px;
          background: #333; color: #fff; font-weight: bold; text-align: center; }
table.pairs td.names { text-align: left; white-space: normal; color: var(--muted); }
table.pairs th:last-child { text-align: left; }
.pair.near-miss { border: 1px solid var(--line); border-radius: 4px; padding: 4px; margin: 0 8px 8px 0; }
.pair .link { padding: 0 6px; }
svg.histogram { display: block; max-width: 100%; height: auto; font: 11px system-ui, sans-serif; }
svg.histogram .bar.below { fill: #9aa4b1; }
svg.histogram .bar.above { fill: var(--other); }
svg.histogram line.axis, svg.histogram line.tick { stroke: #333; }
svg.histogram line.threshold { stroke: #111; stroke-width: 1.5; stroke-dasharray: 5 3; }
svg.histogram text { fill: #333; }
svg.curve { display: block; max-width: 100%; height: auto; font: 11px system-ui, sans-serif; }
svg.curve .precision, svg.curve .recall { fill: none; stroke: #0b5cad; stroke-width: 2; }
svg.curve .recall { stroke: var(--other); stroke-dasharray: 6 3; }
svg.curve line.axis, svg.curve line.tick { stroke: #333; }
svg.curve line.threshold { stroke: #111; stroke-width: 1.5; stroke-dasharray: 5 3; }
svg.curve text.threshold { font-weight: bold; }
svg.histogram text.threshold { font-weight: bold; fill: #111; }
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
  .media { width: 90px; height: 90px; }
  .missing { width: 90px; min-height: 90px; }
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


def _whole_words(text: str) -> str:
    """Text as HTML in which a line breaks between words only: a browser may also break after a hyphen or a
    slash ("--images" as "-" and "-images"), so a word holding one is kept whole; the rest stays plain text."""
    return " ".join(f'<span class="word">{_text(w)}</span>' if re.search(r"\w[-/]|[-/]\w", w) else _text(w)
                    for w in text.split())


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
        media = f'<div class="missing" title="{_visible(name)}"><b>{_whole_words(picture.problem)}</b></div>'
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


def duplicates_page(dups, thumbs: Thumbnails, source: str, key: str, other_thumbs: Thumbnails | None = None) -> str:
    """The duplicates of a `Duplicates` result: the histogram of best-match scores with the threshold, the
    near misses below it, and one card per group with the pairs that joined it and the keep/remove marks.
    `other_thumbs`: where the images of the second file (--against) are read."""
    against = dups.against
    other_thumbs = other_thumbs or thumbs

    def where(m) -> tuple[Thumbnails, str | None]:
        images = other_thumbs if m.other else thumbs
        return images, m.file or images.file(m.path)  # m.file: where the search found it (after a move too)

    threshold = dups.threshold
    exact = sum(g.exact for g in dups.groups)
    between = f"between {_visible(source)} and {_visible(against)}" if against else f"in {_visible(source)}"
    count = "1 group" if len(dups.groups) == 1 else f"{len(dups.groups)} groups"
    sub = (f"{count} of duplicates{f' ({exact} of exact copies)' if exact else ''} {between} "
           f"({_text(key)} vectors). Threshold: cosine similarity {threshold.value:.3f}, from "
           f"{_text(threshold.source)}.")
    sections = [("scores", "Best-match scores and the threshold", _score_section(dups)),
                ("near-misses", "Near misses: just below the threshold", _near_miss_section(dups, thumbs, other_thumbs)),
                ("groups", "Groups", _group_section(dups, where))]
    if dups.calibration is not None:
        sections.insert(1, ("calibration", "Calibration: the threshold fitted to these images",
                            _calibration_section(dups.calibration)))
    sections += [("note", "Notes", "".join(f'<p class="help">{_text(n)}</p>' for n in dups.notes))] if dups.notes else []
    return _page("gpl neighbors --duplicates", sub, _sections(sections))


def _sections(sections: list[tuple[str, str, str]]) -> str:
    toc = ('<nav class="toc" aria-label="Contents"><b>Contents</b><ol>'
           + "".join(f'<li><a href="#{sid}">{_text(title)}</a></li>' for sid, title, _ in sections) + "</ol></nav>")
    return "\n".join([toc] + [f'<section id="{sid}"><h2>{_text(title)}</h2>{content}</section>'
                               for sid, title, content in sections])


def _score_section(dups) -> str:
    best = np.asarray(dups.best)  # compared in its own precision, as the search compared it
    best = best[np.isfinite(best)]
    t = dups.threshold.value
    whose = (f"each image of {_visible(dups.file)} and its most similar image in {_visible(dups.against)}"
             if dups.against else "each image and its most similar other image")
    if not len(best):
        return '<p class="help">No scores: there is no pair of images to compare.</p>'
    above = int((best >= t).sum())
    sample = (f" (measured on a sample of {len(best)} of the {len(dups.best)} images: the file is too large to "
              "search every image exactly)" if len(best) < len(dups.best) else "")
    return (f'<p class="help">How many images have their best match at each cosine similarity: the similarity of '
            f"{whose}. Bars at or right of the dashed line (red) are images with a duplicate; a group of copies "
            "far from the mass of distinct images (left) is easy to separate, and a threshold in a gap between "
            f"them is safe.</p>{histogram_svg(best, t)}"
            f'<p>{above} of {len(best)} images have a match at or above {t:.3f}; '
            f"{int(((best < t) & (best >= t - NEAR_BAND)).sum())} more have their best match within "
            f"{NEAR_BAND:g} below it{sample}.</p>")


NEAR_BAND = 0.05  # "just below the threshold" in the histogram's summary line


def _bin_width(lo: float, hi: float, most: int = 80) -> float:
    """The smallest of a few round bin widths that cuts lo..hi into at most `most` bins."""
    return next((w for w in (0.005, 0.01, 0.02, 0.05, 0.1) if (hi - lo) / w <= most), 0.2)


def histogram_svg(best: np.ndarray, threshold: float, width: int = 760, height: int = 220) -> str:
    """An inline SVG histogram of scores, with bins edged on the threshold so that every bar lies wholly on
    one side of the dashed threshold line. Each bar carries its count and range (data-*) and a tooltip."""
    best = np.asarray(best)
    lo_v, hi_v = float(min(best.min(), threshold - 0.05)), float(max(best.max(), threshold))
    w = _bin_width(lo_v, hi_v)
    first, last = int(np.floor((lo_v - threshold) / w)), int(np.floor((hi_v - threshold) / w))
    edges = threshold + w * np.arange(first, last + 2)
    # bin i holds edges[i] <= score < edges[i + 1], compared in the scores' precision like the search
    index = np.searchsorted(edges.astype(best.dtype), best, side="right") - 1
    counts = np.bincount(np.clip(index, 0, last - first), minlength=last - first + 1)
    left, right, top, bottom = 44, 16, 26, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    lo, span = threshold + first * w, (last - first + 1) * w

    def x(v: float) -> float:
        return left + (v - lo) / span * plot_w

    peak = max(int(counts.max()), 1)
    out = [f'<svg class="histogram" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'data-threshold="{threshold!r}" data-bin="{w!r}" aria-label="histogram of best-match scores">']
    for i, n in enumerate(counts.tolist()):
        b0, b1 = lo + i * w, lo + (i + 1) * w
        h = 0 if n == 0 else max(2.0, n / peak * plot_h)  # a bin with one image stays visible
        side = "above" if first + i >= 0 else "below"
        out.append(f'<rect class="bar {side}" x="{x(b0) + 0.5:.2f}" y="{top + plot_h - h:.2f}" '
                   f'width="{max(x(b1) - x(b0) - 1, 0.5):.2f}" height="{h:.2f}" data-count="{n}" '
                   f'data-from="{b0:.4f}" data-to="{b1:.4f}"><title>{b0:.3f} to {b1:.3f}: {n} images</title></rect>')
    out.append(_x_axis(x, lo, span, left, plot_w, top + plot_h, height, "best-match cosine similarity")
               + f'<text class="axis" x="{left - 6}" y="{top - 10}" text-anchor="start">images</text>'
               f'<text class="axis" x="{left - 6}" y="{top + 4}" text-anchor="end">{peak}</text>'
               f'<text class="axis" x="{left - 6}" y="{top + plot_h}" text-anchor="end">0</text>'
               + _threshold_line(x(threshold), threshold, top, top + plot_h, left + plot_w * 0.7) + "</svg>")
    return "".join(out)


def _x_axis(x, lo: float, span: float, left: float, plot_w: float, base: float, height: int, title: str) -> str:
    """The axis line at `base`, a tick and label every 0.05 or 0.1, and the axis title at the bottom."""
    tick = 0.05 if span <= 0.4 else 0.1
    out = [f'<line class="axis" x1="{left}" x2="{left + plot_w}" y1="{base}" y2="{base}"/>']
    for v in np.arange(np.ceil(lo / tick - 1e-9) * tick, lo + span + 1e-9, tick):
        out.append(f'<line class="tick" x1="{x(v):.2f}" x2="{x(v):.2f}" y1="{base}" y2="{base + 4}"/>'
                   f'<text class="tick" x="{x(v):.2f}" y="{base + 16}" text-anchor="middle">{v:.2f}</text>')
    out.append(f'<text class="axis" x="{left + plot_w / 2:.0f}" y="{height - 2}" text-anchor="middle">{title}</text>')
    return "".join(out)


def _threshold_line(tx: float, value: float, top: float, base: float, flip: float) -> str:
    """The dashed threshold line from `top` to `base`, labelled above it (to its left past x = `flip`)."""
    anchor = "end" if tx > flip else "start"
    return (f'<line class="threshold" x1="{tx:.2f}" x2="{tx:.2f}" y1="{top - 8}" y2="{base}" data-value="{value!r}"/>'
            f'<text class="threshold" x="{tx + (-5 if anchor == "end" else 5):.2f}" y="{top - 10}" '
            f'text-anchor="{anchor}">threshold {value:.3f}</text>')


def _calibration_section(cal) -> str:
    """What the calibration measured: its verdict, the recall per kind of edit, the precision/recall curve and
    the other poolings' figures."""
    verdict = (f"Threshold {cal.threshold:.3f}: precision {cal.precision:.3f} (target {cal.target_precision:g}), "
               f"recall {cal.recall:.3f} of the edited copies." if cal.met else
               f"No threshold reaches precision {cal.target_precision:g} on these images; the best, "
               f"{cal.threshold:.3f}, gives precision {cal.precision:.3f} at recall {cal.recall:.3f}.")
    kinds = [("edit", ["copies", "found", "recall", "median score"])] + [
        (kind, [str(k["copies"]), str(k["found"]), f"{k['recall']:.3f}", f"{k['median']:.3f}"])
        for kind, k in cal.per_kind.items()]
    poolings = [("pooling", ["threshold", "precision", "recall", "target met"])] + [
        (p.key, [f"{p.threshold:.3f}", f"{p.precision:.3f}", f"{p.recall:.3f}", "yes" if p.met else "no"])
        for p in cal.poolings]
    return (f"<p><b>{_text(verdict)}</b></p>"
            f'<p class="help">{cal.images} of your images were edited in memory, one copy per kind of edit, and '
            f"embedded like the file; a copy is found when it scores at least the threshold against its original. "
            f"Precision weighs those copies against {cal.negatives} images and their nearest distinct image.</p>"
            f"<h3>Recall per kind of edit</h3>{_table(kinds)}"
            f"<h3>Precision and recall by threshold</h3>{curve_svg(cal.curve, cal.threshold)}"
            + (f"<h3>Every pooling of the file</h3>{_table(poolings)}" if len(cal.poolings) > 1 else "")
            + f'<p class="help">{_text(cal.advice)}</p>')


def curve_svg(curve: list[tuple[float, float, float]], chosen: float, width: int = 520, height: int = 220) -> str:
    """Precision (solid) and recall (dashed) against the threshold, the chosen threshold as a dotted line."""
    if not curve:
        return ""
    left, right, top, bottom = 44, 110, 26, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    ts = [t for t, _, _ in curve]
    lo, hi = min(ts + [chosen]), max(ts + [chosen])
    span = hi - lo or 1.0

    def x(t: float) -> float:
        return left + (t - lo) / span * plot_w

    def y(v: float) -> float:
        return top + (1 - v) * plot_h

    def line(values: list[float]) -> str:
        return " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in zip(ts, values))

    out = [f'<svg class="curve" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           'aria-label="precision and recall by threshold">',
           f'<polyline class="precision" points="{line([p for _, p, _ in curve])}"/>',
           f'<polyline class="recall" points="{line([r for _, _, r in curve])}"/>',
           f'<line class="axis" x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}"/>',
           _x_axis(x, lo, span, left, plot_w, top + plot_h, height, "threshold")]
    for v in (0.0, 0.5, 1.0):
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.1f}</text>')
    key_x, key_y = left + plot_w + 12, top + plot_h / 2
    out.append(_threshold_line(x(chosen), chosen, top, top + plot_h, left + plot_w * 0.7)
               + f'<line class="precision" x1="{key_x}" x2="{key_x + 20}" y1="{key_y}" y2="{key_y}"/>'
               f'<text x="{key_x + 24}" y="{key_y + 4}">precision</text>'
               f'<line class="recall" x1="{key_x}" x2="{key_x + 20}" y1="{key_y + 18}" y2="{key_y + 18}"/>'
               f'<text x="{key_x + 24}" y="{key_y + 22}">recall</text></svg>')
    return "".join(out)


def _near_miss_section(dups, thumbs: Thumbnails, other_thumbs: Thumbnails) -> str:
    if not dups.near_misses:
        return '<p class="help">No pair of images comes close to the threshold.</p>'
    pairs = "".join(
        f'<div class="pair near-miss" data-score="{s!r}">'
        + _figure(thumbs, a, "")
        + f'<span class="link">{_score(s)}</span>'
        + _figure(other_thumbs, b, "")
        + "</div>"
        for a, b, s in dups.near_misses
    )
    count = len(dups.near_misses)
    return (f'<p class="help">{"The most similar pair that stays" if count == 1 else f"The {count} most similar pairs that stay"} '
            "below the threshold, most similar first, with their cosine similarity. If some of them are copies you want found, the "
            "threshold is too high for these images: give --threshold just below their score, or let "
            f'--calibrate fit one to your images.</p><div class="cells pairs">{pairs}</div>')


def _group_section(dups, where) -> str:
    if not dups.groups:
        return '<p class="help">No duplicates at this threshold.</p>'
    rule = dups.keep_rule
    legend = ('<p class="legend"><span><span class="mark keep">&#10003;&nbsp;keep</span>: solid green frame</span>'
              '<span><span class="mark remove">&#10007;&nbsp;remove</span>: dashed red frame</span>'
              f"<span>one kept per group by --keep {_text(rule)} (ties broken by path)</span></p>" if rule else "")
    help_text = ('<p class="help">Images whose cosine similarity reaches the threshold are joined into groups (A~B '
                 "and B~C make one group, even when A and C are further apart); identical files form exact groups "
                 "before any vector is compared. Under each image: its highest similarity to another member, its "
                 "size in pixels and on disk"
                 + ("" if rule else "; 'largest' marks the most pixels (then the most bytes)")
                 + "; 'exact copy': its bytes are identical to another member's. Below the images: which image "
                 "matched which, by their letters.</p>")
    return help_text + legend + "".join(_group_card(number, g, where, rule) for number, g in enumerate(dups.groups, 1))


PAIRS_SHOWN = 30  # pairs listed under a group; a large group's full list is in --json


def _group_card(number: int, group, where, rule: str | None) -> str:
    """One group: its images with their marks and sizes, then its pairs, most similar first."""
    members = group.members
    files = [where(m) for m in members]
    pictures = [thumbs[file] for thumbs, file in files]
    areas = [(p.size[0] * p.size[1], p.file_bytes) if p.size else (-1, -1) for p in pictures]
    largest = max(range(len(members)), key=lambda i: areas[i]) if max(areas)[0] > 0 and not rule else None
    cells = []
    for i, (m, p, (thumbs, file)) in enumerate(zip(members, pictures, files)):
        facts = (f"{p.size[0]}&nbsp;&times;&nbsp;{p.size[1]}&nbsp;px, {human_bytes(p.file_bytes).replace(' ', '&nbsp;')}"
                 if p.size else "not readable")
        mark = css = ""
        if rule:
            css = "keep" if m.keep else "remove"
            mark = (f'<span class="mark {css}">{"&#10003;&nbsp;keep" if m.keep else "&#10007;&nbsp;remove"}</span>')
        tags = (' <span class="tag">largest</span>' if i == largest else "") + (
            ' <span class="tag exact">exact copy</span>' if m.exact else "")
        cells.append(_figure(thumbs, m.path, f"{_letter(i)}{mark}<br>best match {_score(m.score)}<br>{facts}{tags}", css,
                             file, f' data-member="{i}"'))
    ranked = sorted(group.pairs, key=lambda p: (-p[2], p[0], p[1]))
    rows = "".join(f'<tr class="matched" data-a="{a}" data-b="{b}" data-score="{s!r}"><td>{_letter(a)}&nbsp;&harr;&nbsp;'
                   f'{_letter(b)}</td><td>{_score(s)}</td><td class="names">{_name(members[a].path)} &harr; '
                   f"{_name(members[b].path)}</td></tr>" for a, b, s in ranked[:PAIRS_SHOWN])
    more = (f'<p class="help">and {len(ranked) - PAIRS_SHOWN} more pairs (all of them in --json)</p>'
            if len(ranked) > PAIRS_SHOWN else "")
    kind = '<span class="tag exact">exact copies: identical bytes</span>' if group.exact else ""
    return (f'<div class="card group" data-group="{number}"><h3>Group {number}: {len(members)} images {kind}</h3>'
            f'<div class="cells">{"".join(cells)}</div>'
            f'<table class="pairs"><thead><tr><th>pair</th><th>similarity</th><th>images</th></tr></thead>'
            f"<tbody>{rows}</tbody></table>{more}</div>")


def _letter(i: int) -> str:
    """A member's short name within its group: A, B, ..., Z, AA, AB, ..."""
    name = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        name = chr(65 + r) + name
    return f'<span class="letter">{name}</span>'


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


def clusters_page(clusters, thumbs: Thumbnails, source: str, key: str) -> str:
    """A gallery of clusters, largest first: every image of each cluster with its best match inside it."""
    cards = []
    for number, group in enumerate(clusters.groups, 1):
        cells = "".join(_figure(thumbs, m.path, f"best match {_score(m.score)}") for m in group.members)
        cards.append(f'<div class="card cluster" data-cluster="{number}"><h3>Cluster {number}: {len(group.members)} '
                     f'images</h3><div class="cells">{cells}</div></div>')
    t = clusters.threshold
    sub = (f"{len(cards)} {'cluster' if len(cards) == 1 else 'clusters'} of similar images in {_visible(source)} ({_text(key)} vectors), largest first: "
           f"images whose cosine similarity is at least {t.value:.3f} (from {_text(t.source)}) are joined, and A~B "
           "and B~C make one cluster. Under each image: its highest similarity to another member of its cluster. "
           "Images close to no other are in no cluster.")
    body = "\n".join(cards) if cards else '<p class="help">No two images are this similar: no cluster.</p>'
    return _page("gpl neighbors --clusters", sub, "<section>" + body + "</section>")


def mislabels_page(found, thumbs: Thumbnails, source: str, key: str) -> str:
    """Each likely mislabelled image with its label, the label proposed, and its k nearest images marked
    with theirs."""
    labels, k = found.labels, found.k
    rows = []
    for m in found.items:
        others = round(m.score * k)
        caption = (f'<span class="tag">likely mislabel {m.rank}</span><br>labelled <b>{_name(m.label)}</b>'
                   f'<span class="mark other">&rarr;&nbsp;{_name(m.proposed)}?</span>'
                   f"{others} of {k} nearest: another label")
        cells = []
        for nb in m.neighbors:
            same = labels[nb.row] == m.label
            mark = ('<span class="mark same">&#10003;&nbsp;same label</span>' if same else
                    f'<span class="mark other">&#10007;&nbsp;{_name(labels[nb.row])}</span>')
            cells.append(_figure(thumbs, nb.path, f"#{nb.rank} {_score(nb.score)}{mark}", "same" if same else "other"))
        rows.append(f'<div class="row mislabel" data-row="{m.row}">'
                    + _figure(thumbs, m.path, caption, "query-image")
                    + f'<div class="cells">{"".join(cells)}</div></div>')
    sub = (f"{len(rows)} images of {_visible(source)} ({_text(key)} vectors, labels from {_text(found.source)}) whose "
           f"{k} nearest other images mostly carry another label, most suspicious first; the label most common among "
           "those neighbours is proposed. Check each by eye: an unusual photo of its own class is listed too.")
    legend = ('<p class="legend"><span><span class="mark same">&#10003;&nbsp;same label</span>: solid green frame'
              '</span><span><span class="mark other">&#10007;&nbsp;another label</span> (named): dashed red frame'
              "</span></p>")
    body = legend + "\n".join(rows) if rows else '<p class="help">No image has mostly other labels around it.</p>'
    return _page("gpl neighbors --mislabels", sub, "<section>" + body + "</section>")


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
    """The page of a `gpl neighbors` result (`kind`: neighbors, duplicates, outliers, clusters or mislabels) over
    `file`; its images read below `images` when given, else below the root `file` records."""
    from gpl_cli.analysis.neighbors import choose_pooling
    from gpl_cli.store.formats import read_metadata

    page = {"neighbors": neighbors_page, "duplicates": duplicates_page, "outliers": outliers_page,
            "clusters": clusters_page, "mislabels": mislabels_page}[kind]
    metadata = read_metadata(file)
    thumbs = Thumbnails(metadata.get("root"), images)
    if kind == "duplicates" and results.against:  # the second file's images, below the root it records
        options["other_thumbs"] = Thumbnails(read_metadata(results.against).get("root"))
    write_page(output, page(results, thumbs, file, choose_pooling(metadata, key, file), **options))
