"""`gpl compare` from start to end: what `run_compare` does with a `CompareRequest`.

The inputs are either saved embedding files or images (class folders, or files with --labels). Images
are embedded once with every pooling (gpl_cli.embedding.job.Job), optionally kept in --save; labels come
from the folders or the CSV; `gem:p=auto` adds GeM's grid to the same forward pass and chooses p; the
probe adds a second pass for the flattened maps; --search adds one per resize mode and scale it tries
(gpl_cli.analysis.search), the default's being the report's own. Every output (--save, --plot, --html) is checked before
anything is embedded, and --save is written only once the embeddings passed every check of the comparison,
so a refused comparison leaves no file behind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from gpl_cli.analysis import compare as cmp, search
from gpl_cli.analysis.rerank import parse_rerank_list
from gpl_cli.defaults import COMPARE_POOLS
from gpl_cli.errors import GplError
from gpl_cli.store.embeddings import Embeddings
from gpl_cli.store.formats import is_embeddings_file
from gpl_cli.store.output import FIGURE, PAGE, Output


@dataclass
class CompareRequest:
    inputs: list[str]
    pools: list[str] = field(default_factory=list)
    labels_csv: str | None = None
    plot: str | None = None
    save: str | None = None
    html: str | None = None
    html_queries: int = 3
    images: str | None = None  # --images: the folder pages read images from (default: the file's recorded root)
    overwrite: bool = False
    backbone: str | None = None  # None: the default, and no image option was given
    weights: str | None = None
    normalize: str = "none"
    options: object = None  # embedding.config.RunOptions, for images
    nul: bool = False
    probe: bool = False
    folds: int = 5
    image_options: list[str] = field(default_factory=list)  # the image-only options the user gave, by name
    scales: tuple[float, ...] = (1.0,)  # --scales: each image run at these multiples of the input size
    resize: str = "crop"  # --resize
    rerank: list[str] = field(default_factory=list)  # --rerank: each value one re-ranking ('dba,aqe': two steps)
    search: bool = False  # --search
    search_resizes: tuple[str, ...] = ()  # with --search, the --resize values (empty: search.DEFAULT_RESIZES)
    search_scales: tuple[tuple[float, ...], ...] = ()  # with --search, the --scales values (empty: the defaults)


def run_compare(request: CompareRequest, on_progress: Callable[[str, int, int], None] | None = None,
                on_failure: Callable | None = None, on_note: Callable[[str], None] = lambda text: None) -> cmp.Report:
    """The report `gpl compare` prints, with its plot and page written when asked for."""
    from gpl_cli.analysis.gem_auto import split_auto

    plot = Output.resolve(request.plot, kind=FIGURE, overwrite=request.overwrite).check() if request.plot else None
    page = Output.resolve(request.html, kind=PAGE, overwrite=request.overwrite).check() if request.html else None
    pools, auto = split_auto(list(request.pools))
    variants = [parse_rerank_list([value]) for value in request.rerank]  # a bad spec fails before anything runs
    if request.probe or auto:
        from gpl_cli.analysis.probe import model_module

        model_module()  # scikit-learn missing: say how to install it before anything runs
    run = None
    if all(is_embeddings_file(arg) for arg in request.inputs):
        if request.image_options:
            raise GplError(f"--{request.image_options[0].replace('_', '-')} applies to images; {request.inputs[0]} "
                           "already holds embeddings")
        for what, asked in (("gem:p=auto pools a grid of p from the images' feature maps", auto),
                            ("--search embeds the images at each size it tries", request.search)):
            if asked:
                raise GplError(f"{what}: give the images (class folders or --labels), not the embeddings file "
                               f"{request.inputs[0]}")
        emb = cmp.load_embedding_files(list(request.inputs), pools)
        keys, pool_seconds, maps_from, save = None, None, None, None
        source = f"{emb.metadata.get('backbone', '?')} from {' + '.join(request.inputs)}"
        if "compared_runs" in emb.metadata:
            source += f" ({' vs '.join(emb.metadata['compared_runs'])})"
        labels = cmp.image_labels(emb.paths, request.labels_csv, emb.metadata.get("root"), on_note)
    elif any(is_embeddings_file(arg) for arg in request.inputs):
        raise GplError("give either images (folders, files, -) or embedding files (.h5/.npy), not both")
    else:
        if request.search and auto:
            raise GplError("--search takes fixed poolings: choose GeM's p first (--pool gem:p=auto without --search)")
        run = _embed(request, pools, auto, on_progress, on_failure, on_note)
        emb, keys, pool_seconds, maps_from, save = run.emb, run.keys, run.pool_seconds, run.maps_from, run.save
        source = f"{request.backbone} on {' '.join(request.inputs)}"
        # Silent: the CSV's rows were matched against every input, and reported, before the model loaded.
        labels = cmp.image_labels(emb.paths, request.labels_csv, emb.metadata.get("root"))
    if emb.failures:
        on_note(f"{len(emb.failures)} images could not be read and are left out of the comparison")
    if request.probe or auto:
        from gpl_cli.analysis.probe import check_labels

        check_labels(labels, request.probe, auto, request.folds)
    cmp.check_vectors(emb, keys or list(emb.vectors))  # unreadable images may have left too few
    if save:
        cmp.save_embeddings(emb, save)
    gem = None
    if auto:
        from gpl_cli.analysis import gem_auto

        gem = gem_auto.choose_p({p: emb.vectors[k] for p, k in zip(gem_auto.GRID, gem_auto.grid_keys())}, labels,
                                request.folds)
        chosen = gem_auto.grid_keys()[gem_auto.GRID.index(gem.best_p)]
        keys = [*keys, *([chosen] if chosen not in keys else [])]
    report = cmp.compare(emb, labels, keys=keys, pool_seconds=pool_seconds, source=source, on_progress=on_progress,
                         rerank=variants)
    report.gem_auto = gem
    report.embed_seconds = run.seconds if run else None
    if request.search:
        report.search = _search(request, run, labels, on_progress, on_note)
    if request.probe:
        from gpl_cli.analysis.probe import probe_report

        if maps_from:
            on_note("a second forward pass keeps the flattened feature maps for the probe")
        report.probe = probe_report(emb, labels, [p.key for p in report.poolings], request.folds, maps_from,
                                    on_progress=lambda key: on_note(f"probing {key}"))
    if plot:
        from gpl_cli.report.plots import plot_report

        plot_report(report, plot)
    if page:
        from gpl_cli.report import html

        thumbs = html.Thumbnails(emb.metadata.get("root"), request.images)
        html.write_page(page, html.compare_page(report, emb, labels, thumbs, request.html_queries))
        on_note(f"wrote {page.path}")
    return report


@dataclass
class _Run:
    """What compare embedded from images."""

    emb: Embeddings  # the compared poolings (and any extra the search needs), at the report's size
    keys: list[str]  # the poolings compared
    pool_seconds: dict[str, float]
    maps_from: object  # probe.MapSource, with --probe
    save: Output | None  # the checked --save output
    seconds: float  # the embedding run, wall time
    scale_seconds: dict[str, float]  # model time per scale label
    backbone: object  # the loaded Backbone, for the search's further passes
    items: object  # embedding.inputs.InputList


def _embed(request: CompareRequest, pools: list[str], auto: bool, on_progress, on_failure, on_note) -> _Run:
    """The images embedded once with every pooling, in memory (with --search: at the default size, and with avg,
    the default the search measures its gains against)."""
    from gpl_cli.analysis.gem_auto import grid_keys
    from gpl_cli.embedding.config import EmbedConfig
    from gpl_cli.embedding.inputs import collect_inputs

    asked = pools or ([] if auto else list(search.DEFAULT_POOLS if request.search else COMPARE_POOLS))
    config = EmbedConfig(backbone=request.backbone, weights=request.weights, pools=tuple(asked),
                         normalize=request.normalize, scales=request.scales, resize=request.resize)
    keys = [s.key for s in config.pool_specs()] if asked else []  # a bad --pool fails before any loading
    if auto:
        config.pools = (*keys, *(k for k in grid_keys() if k not in keys))
    if request.search:
        config.pools = (*keys, *([search.DEFAULT.pool] if search.DEFAULT.pool not in keys else []))
    save = Output.resolve(request.save, keys=config.pools, overwrite=request.overwrite) if request.save else None
    items = collect_inputs(request.inputs, nul_separated=request.nul)
    cmp.check_image_count(sum(1 for it in items.items if not it.error))  # unreadable folders are no images
    if save:
        save.check([it.path for it in items.items])
    early = cmp.image_labels([it.name for it in items.items], request.labels_csv, items.root, on_note)  # before the model
    if request.probe or auto:
        from gpl_cli.analysis.probe import check_labels

        check_labels(early, request.probe, auto, request.folds)
    if request.search:
        search.check_labels(early)
    loaded = maps_from = None
    if request.probe or request.search:
        from gpl_cli.models.backbones import load_backbone

        loaded = load_backbone(config.backbone, config.weights)  # shared by every forward pass
    if request.probe:
        from gpl_cli.analysis.probe import MapSource

        maps_from = MapSource(config, loaded, items.items, request.options)
    emb, summary = cmp.embed_images(config, items, request.options, backbone=loaded, on_progress=on_progress,
                                    on_failure=on_failure)
    return _Run(emb, keys, summary.pool_seconds, maps_from, save, summary.seconds, summary.scale_seconds, loaded, items)


def _search(request: CompareRequest, run: _Run, labels: list[str], on_progress, on_note) -> search.SearchResult:
    """The search's forward passes (each resize mode and scale once; the default's is the report's own), then
    the nested cross-validation over its pipelines."""
    from gpl_cli.defaults import DEFAULT_BACKBONE
    from gpl_cli.embedding.config import EmbedConfig
    from gpl_cli.embedding.job import Job
    from gpl_cli.pooling.scales import scale_key, scale_label

    resizes = request.search_resizes or search.DEFAULT_RESIZES
    scale_sets = request.search_scales or search.DEFAULT_SCALE_SETS
    reranks = [",".join(map(str, parse_rerank_list([v]))) for v in request.rerank] or list(search.DEFAULT_RERANKS)
    pipelines = search.search_space(run.keys, resizes, scale_sets, reranks)
    pools = list(dict.fromkeys([*run.keys, search.DEFAULT.pool]))
    passes = []
    for resize in dict.fromkeys(p.resize for p in pipelines):
        # the report's own pass is the default's: crop at scale 1
        scales = sorted({s for p in pipelines if p.resize == resize for s in p.scales} - ({1.0} if resize == "crop" else set()))
        if scales:
            on_note(f"--search: a forward pass per scale, {resize} at {', '.join(map(scale_label, scales))}")
            config = EmbedConfig(backbone=request.backbone, weights=request.weights, pools=tuple(pools),
                                 resize=resize, scales=tuple(scales))
            job = Job(config, request.options, len(run.items.items), backbone=run.backbone, per_scale=True,
                      on_progress=on_progress)
            passes.append((resize, scales, job.embeddings(run.items)))
    common = set(run.emb.paths).intersection(*(set(emb.paths) for _, _, emb in passes))
    kept = [i for i, path in enumerate(run.emb.paths) if path in common]  # an image may fail in one pass only
    if len(kept) < len(run.emb):
        on_note(f"--search: {len(run.emb) - len(kept)} images failed in one of its passes and are left out of it")
    views = search.Views({("crop", 1.0, key): run.emb.vectors[key][kept] for key in pools},
                         {("crop", 1.0): run.scale_seconds.get(scale_label(1.0))})
    for resize, scales, emb in passes:
        where = {path: i for i, path in enumerate(emb.paths)}
        order = [where[run.emb.paths[i]] for i in kept]
        for scale in scales:
            views.seconds[(resize, scale)] = emb.summary.scale_seconds.get(scale_label(scale))
            views.vectors.update({(resize, scale, key): emb.vectors[scale_key(key, scale)][order] for key in pools})
    kept_labels = [labels[i] for i in kept]
    on_note(f"--search: {len(pipelines)} pipelines by nested cross-validation")
    result = search.nested_search(views, pipelines, kept_labels, request.folds, on_progress)
    counts = {c: kept_labels.count(c) for c in set(kept_labels)}
    example = next(run.emb.paths[i] for i, c in zip(kept, kept_labels) if counts[c] >= 2)  # a query's stored name
    options = [*(["--backbone", request.backbone] if request.backbone != DEFAULT_BACKBONE else []),
               *(["--weights", request.weights] if request.weights else [])]
    result.commands = result.winner.commands(list(request.inputs), options, example)
    return result
