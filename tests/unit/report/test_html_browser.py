"""The HTML pages in a real browser: headless Chromium (Debian's `chromium` package) driven by Playwright.

Why Playwright: its Python package reports console messages and uncaught page errors as events and
evaluates JavaScript in the page, which is what these checks need, and it drives an installed
Chromium through `executable_path` without downloading a browser of its own. Selenium would also
need Debian's `chromium-driver` of the matching version, and reaching the console log goes through
driver-specific logging preferences; `chromium --dump-dom` shows neither console errors nor image
loading. Tests skip, with the reason, when the package or the browser is missing (.ci/run installs both).

One real embedding (EfficientNet-Lite0, in-process) of ten photos in three class folders, one of
them a smaller copy of another named as an attack (so it is in every page: a query, a duplicate,
an outlier row); the four pages are made by the CLI, one subprocess each, and checked in one browser.
"""

from __future__ import annotations

import re
import shutil

import pytest
from conftest import REPO, embed_to, run_gpl

PHOTOS = REPO / "tests" / "data" / "labeled_photos"
HOSTILE = "fish/<img src=x onerror=window.__pwned=1>.jpg"  # a smaller copy of fish/fish1.webp
CHOSEN = {"animal": ["cat.webp", "cow.webp", "dog.webp"], "fish": ["fish1.webp", "fish2.webp", "fish10.webp"],
          "tool": ["hammer1.webp", "hammer2.webp", "hammer3.webp"]}
GONE = "tool/hammer1.webp"  # moved away after embedding: a placeholder, not a broken <img>
LONG = "fish/a_fish_under_a_rather_long_name_with_underscores.webp"  # fish/fish10.webp renamed: wraps at _ only
BROKEN = "tool/broken.webp"  # not an image: listed on the compare page as unreadable


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        pytest.skip(reason="Playwright's Python package is not installed (pip install playwright)")
    executable = chromium_path()
    if executable is None:
        pytest.skip(reason="no chromium on PATH (apt-get install chromium)")
    with sync_playwright() as p:
        try:
            # --no-sandbox: Chromium's sandbox cannot start as root, which is how CI runs
            chromium = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        except Error as exc:
            pytest.skip(reason=f"{executable} does not start headless: {str(exc).splitlines()[0]}")
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def pages(tmp_path_factory, lite0):
    """Three class folders of real photos, one of them a near-duplicate named as an attack,
    embedded with avg and max; then the four pages, each made by the CLI."""
    from PIL import Image

    from gpl_cli.embedding.config import EmbedConfig, RunOptions
    from gpl_cli.embedding.inputs import collect_inputs
    from gpl_cli.store.output import Output

    root = tmp_path_factory.mktemp("browser")
    photos = root / "photos"
    for cls, files in CHOSEN.items():
        (photos / cls).mkdir(parents=True)
        for name in files:
            shutil.copy(PHOTOS / cls / name, photos / cls / name)
    fish = Image.open(photos / "fish" / "fish1.webp")
    fish.resize((fish.width * 3 // 4, fish.height * 3 // 4)).convert("RGB").save(photos / HOSTILE)
    (photos / "fish" / "fish10.webp").rename(photos / LONG)
    (photos / BROKEN).write_bytes(b"not an image")
    emb = root / "photos.h5"
    embed_to(EmbedConfig(pools=("avg", "max")), collect_inputs([str(photos)]), Output.resolve(str(emb)),
              RunOptions(), backbone=lite0)
    (photos / GONE).rename(root / "hammer1_moved.webp")
    out = {}
    runs = {
        # 3 per class where the poolings disagree + 1 typical: every image is a query (classes of 3 and 4)
        "compare": ("compare", str(emb), "--html-queries", "3"),
        "neighbors": ("neighbors", str(emb), "fish/fish2.webp", GONE, HOSTILE, "-k", "4"),
        "duplicates": ("neighbors", str(emb), "--duplicates", "--threshold", "0.9"),
        "outliers": ("neighbors", str(emb), "--outliers", "-k", "2", "--top", "10"),
        "clusters": ("neighbors", str(emb), "--clusters", "--cluster-threshold", "0.6"),
        "mislabels": ("neighbors", str(emb), "--mislabels", "-k", "2"),
    }
    for kind, args in runs.items():
        page = root / f"{kind}.html"
        proc = run_gpl(*args, "--html", str(page), check=True)
        out[kind] = (page, proc.stdout.decode())
    return out


def look(browser, page_file) -> dict:
    """Open the page from file:// and collect what a person (and an attacker) would see."""
    tab = browser.new_page()
    problems: list[str] = []
    tab.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
    tab.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    tab.on("request", lambda r: problems.append(f"request: {r.url}") if not r.url.startswith(("file:", "data:")) else None)
    tab.goto(page_file.as_uri())
    seen = tab.evaluate("""() => ({
        images: [...document.images].map(i => ({loaded: i.complete && i.naturalWidth > 0, alt: i.alt})),
        pwned: typeof window.__pwned,
        injected: document.querySelectorAll('img[src="x"], script').length,
        text: document.body.innerText,
        missing: [...document.querySelectorAll('.missing')].map(d => d.title),
        rows: [...document.querySelectorAll('.row')].map(row => ({
            query: row.querySelector(':scope > figure .path').textContent,
            poolings: [...row.querySelectorAll('.pooling')].map(p => p.dataset.pooling),
            cells: [...row.querySelectorAll(':scope > .cells figure, .pooling figure')].map(f => ({
                path: f.querySelector('.path').textContent,
                mark: f.classList.contains('same') ? 'same' : f.classList.contains('other') ? 'other' : null,
            })),
        })),
        cards: [...document.querySelectorAll('.card.group')].map(c => c.querySelectorAll('figure').length),
    })""")
    tab.close()
    seen["problems"] = problems
    return seen


def assert_clean(seen: dict) -> None:
    """No console error, nothing fetched, every <img> decoded, the attack's name shown as text and inert."""
    assert seen["problems"] == []
    assert seen["images"] and all(i["loaded"] for i in seen["images"]), [i for i in seen["images"] if not i["loaded"]]
    assert HOSTILE in seen["text"]
    assert seen["pwned"] == "undefined" and seen["injected"] == 0


def test_compare_report(browser, pages):
    seen = look(browser, pages["compare"][0])
    assert_clean(seen)
    images = [f"{cls}/{name}" for cls, names in CHOSEN.items() for name in names if name != "fish10.webp"]
    queries = [r for r in seen["rows"] if r["poolings"]]
    assert {r["query"] for r in queries} <= {*images, HOSTILE, LONG} and len(queries) >= 3
    for row in queries:
        assert row["poolings"] == ["avg", "max"]
        assert len(row["cells"]) == 2 * 5  # 5 nearest under each pooling
        query_class = row["query"].split("/")[0]
        for cell in row["cells"]:
            assert cell["mark"] == ("same" if cell["path"].split("/")[0] == query_class else "other"), (row, cell)
        assert row["query"] not in [c["path"] for c in row["cells"]]
    assert GONE in seen["missing"]
    page = browser.new_page(viewport={"width": 1040, "height": 800})
    page.goto(pages["compare"][0].as_uri())
    found = page.evaluate("""() => ({
        toc: [...document.querySelectorAll('nav.toc a')].map(a => [a.getAttribute('href'),
              !!document.querySelector(a.getAttribute('href') + ' > h2')]),
        unreadable: document.querySelector('#unreadable') ? document.querySelector('#unreadable').innerText : '',
        only: [...document.querySelectorAll('.row.query')].flatMap(row => [...row.querySelectorAll('.pooling')].flatMap(
            p => [...p.querySelectorAll('figure')].map(f => ({
                path: f.querySelector('.path').textContent,
                marked: f.classList.contains('only'),
                elsewhere: [...row.querySelectorAll('.pooling')].filter(q => q !== p).some(q =>
                    [...q.querySelectorAll('figure .path')].some(e => e.textContent === f.querySelector('.path').textContent)),
            })))),
        // every place a caption's text goes to a new line inside a word: the character before the break
        breaks: [...document.querySelectorAll('figcaption .path, figcaption .mark')].flatMap(el => {
            const out = [];
            const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
            let previous = null, space = false, node;
            while ((node = walker.nextNode())) {
                for (let i = 0; i < node.length; i++) {
                    if (!node.data[i].trim()) { space = true; continue; }  // a space is a place to break
                    const range = document.createRange();
                    range.setStart(node, i); range.setEnd(node, i + 1);
                    const box = range.getClientRects()[0];
                    if (!box) continue;
                    if (previous && !space && box.top > previous.top + 2) out.push([el.textContent, previous.char]);
                    previous = {top: box.top, char: node.data[i]};
                    space = false;
                }
            }
            return out;
        }),
    })""")
    page.close()
    assert found["toc"] and all(ok for _, ok in found["toc"]), found["toc"]
    assert [h for h, _ in found["toc"]][:1] == ["#verdict"] and "#queries" in [h for h, _ in found["toc"]]
    assert BROKEN in found["unreadable"]
    assert found["only"] and all(c["marked"] == (not c["elsewhere"]) for c in found["only"]), found["only"]
    assert found["breaks"], "the long name should wrap"
    assert all(char in "/_" for _, char in found["breaks"]), [b for b in found["breaks"] if b[1] not in "/_"]


def test_neighbors_page(browser, pages):
    seen = look(browser, pages["neighbors"][0])
    assert_clean(seen)
    assert [r["query"] for r in seen["rows"]] == ["fish/fish2.webp", GONE, HOSTILE]
    assert [len(r["cells"]) for r in seen["rows"]] == [4, 4, 4]
    blocks = pages["neighbors"][1].strip().split("\n\n")
    for row, block in zip(seen["rows"], blocks):
        assert [c["path"] for c in row["cells"]] == [line.split("\t")[2] for line in block.splitlines()[1:]]
    assert GONE in seen["missing"] and GONE in seen["text"]


def test_duplicates_page(browser, pages):
    seen = look(browser, pages["duplicates"][0])
    assert_clean(seen)
    groups = [line.split("\t")[0] for line in pages["duplicates"][1].splitlines()]
    sizes = [groups.count(g) for g in dict.fromkeys(groups)]
    assert seen["cards"] == sizes and sizes  # the planted copy makes at least one group
    assert re.search(r"\d+\s\u00d7\s\d+\spx, \d", seen["text"])  # pixel and file sizes to choose which to keep


def test_outliers_page(browser, pages):
    seen = look(browser, pages["outliers"][0])
    assert_clean(seen)
    listed = [line.split("\t")[2] for line in pages["outliers"][1].splitlines()]
    assert [r["query"] for r in seen["rows"]] == listed and len(listed) == 10
    assert all(len(r["cells"]) == 2 for r in seen["rows"])


def test_clusters_and_mislabels_pages(browser, pages):
    for kind in ("clusters", "mislabels"):
        seen = look(browser, pages[kind][0])
        assert seen["problems"] == [] and seen["pwned"] == "undefined" and seen["injected"] == 0
        assert all(i["loaded"] for i in seen["images"])
    clusters = [line.split("\t") for line in pages["clusters"][1].splitlines()]
    tab = browser.new_page()
    tab.goto(pages["clusters"][0].as_uri())
    shown = tab.evaluate("""() => [...document.querySelectorAll('.card.cluster')].map(
        c => [...c.querySelectorAll('figure .path')].map(p => p.textContent))""")
    tab.close()
    assert clusters and shown == [[p for c, _, p in clusters if c == n] for n in dict.fromkeys(c for c, _, _ in clusters)]
    listed = [line.split("\t")[2] for line in pages["mislabels"][1].splitlines()]
    seen = look(browser, pages["mislabels"][0])
    assert [r["query"] for r in seen["rows"]] == listed
    assert all(len(r["cells"]) == 2 and all(c["mark"] for c in r["cells"]) for r in seen["rows"])


# Where a placeholder's text goes to a new line inside a word, overflows its box, or is cut off by it.
PLACEHOLDER_PROBLEMS = """() => [...document.querySelectorAll('.missing')].flatMap(box => {
    const out = [];
    const frame = box.getBoundingClientRect();
    if (box.scrollHeight > box.clientHeight + 1 || box.scrollWidth > box.clientWidth + 1)
        out.push(['clipped', box.title, box.scrollWidth, box.clientWidth, box.scrollHeight, box.clientHeight]);
    const walker = document.createTreeWalker(box, NodeFilter.SHOW_TEXT);
    let previous = null, space = false, node;
    while ((node = walker.nextNode())) {
        for (let i = 0; i < node.length; i++) {
            if (!node.data[i].trim()) { space = true; continue; }
            const range = document.createRange();
            range.setStart(node, i); range.setEnd(node, i + 1);
            const r = range.getClientRects()[0];
            if (!r) continue;
            if (r.left < frame.left - 0.5 || r.right > frame.right + 0.5 || r.bottom > frame.bottom + 0.5)
                out.push(['outside its box', box.title, node.data[i]]);
            if (previous && !space && r.top > previous.top + 2)
                out.push(['broken mid-word', box.title, previous.text + '|' + node.data.slice(i, i + 8)]);
            previous = {top: r.top, text: node.data.slice(Math.max(0, i - 8), i)};
            space = false;
        }
    }
    return out;
})"""


def test_placeholders_break_between_words_only_and_are_never_cut_off(browser, pages, tmp_path):
    """Every kind of placeholder (gone, outside the folder, not an image), on screen, in print (narrower boxes) and
    with a larger font (a reader's minimum font size): whole words, all inside the box."""
    from conftest import make_photo_like
    from PIL import Image

    from gpl_cli.analysis.neighbors import Neighbor, QueryResult
    from gpl_cli.report import html as hr

    Image.fromarray(make_photo_like((64, 48))).save(tmp_path / "ok.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    found = [QueryResult("ok.png", "file", [Neighbor(1, 0.9, "gone/deleted.jpg", 1), Neighbor(2, 0.8, "../outside.jpg", 2),
                                            Neighbor(3, 0.7, "broken.jpg", 3)])]
    made = tmp_path / "placeholders.html"
    made.write_text(hr.neighbors_page(found, hr.Thumbnails(str(tmp_path)), "x.h5", "avg"), encoding="utf-8")
    files = [made] + [page for page, _ in pages.values()]
    checked = 0
    for media, font in (("screen", None), ("print", None), ("screen", "16px")):
        tab = browser.new_page(viewport={"width": 900, "height": 800})
        tab.emulate_media(media=media)
        for file in files:
            tab.goto(file.as_uri())
            if font:
                tab.add_style_tag(content=f".missing {{ font-size: {font}; }}")
            assert tab.evaluate(PLACEHOLDER_PROBLEMS) == [], (file.name, media, font)
            checked += tab.evaluate("document.querySelectorAll('.missing').length")
        tab.close()
    assert checked >= 3 * 4  # the three kinds made here, and the moved photo on the CLI's pages
