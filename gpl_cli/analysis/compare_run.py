"""`gpl compare` from start to end: what `run_compare` does with a `CompareRequest`.

The inputs are either saved embedding files or images (class folders, or files with --labels). Images
are embedded once with every pooling (gpl_cli.embedding.job.Job), optionally kept in --save; labels come
from the folders or the CSV; `gem:p=auto` adds GeM's grid to the same forward pass and chooses p; the
probe adds a second pass for the flattened maps. Every output (--save, --plot, --html) is checked before
anything is embedded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from gpl_cli.analysis import compare as cmp
from gpl_cli.defaults import COMPARE_POOLS
from gpl_cli.errors import GplError
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


def run_compare(request: CompareRequest, on_progress: Callable[[str, int, int], None] | None = None,
                on_failure: Callable | None = None, on_note: Callable[[str], None] = lambda text: None) -> cmp.Report:
    """The report `gpl compare` prints, with its plot and page written when asked for."""
    from gpl_cli.analysis.gem_auto import split_auto

    plot = Output.resolve(request.plot, kind=FIGURE, overwrite=request.overwrite).check() if request.plot else None
    page = Output.resolve(request.html, kind=PAGE, overwrite=request.overwrite).check() if request.html else None
    pools, auto = split_auto(list(request.pools))
    if request.probe or auto:
        from gpl_cli.analysis.probe import model_module

        model_module()  # scikit-learn missing: say how to install it before anything runs
    if all(is_embeddings_file(arg) for arg in request.inputs):
        if request.image_options:
            raise GplError(f"--{request.image_options[0].replace('_', '-')} applies to images; {request.inputs[0]} "
                           "already holds embeddings")
        if auto:
            raise GplError("gem:p=auto pools a grid of p from the images' feature maps: give the images (class "
                           f"folders or --labels), not the embeddings file {request.inputs[0]}")
        emb = cmp.load_embedding_files(list(request.inputs), pools)
        keys, pool_seconds, maps_from = None, None, None
        source = f"{emb.metadata.get('backbone', '?')} from {' + '.join(request.inputs)}"
    elif any(is_embeddings_file(arg) for arg in request.inputs):
        raise GplError("give either images (folders, files, -) or embedding files (.h5/.npy), not both")
    else:
        emb, keys, pool_seconds, maps_from = _embed(request, pools, auto, on_progress, on_failure)
        source = f"{request.backbone} on {' '.join(request.inputs)}"
    if emb.failures:
        on_note(f"{len(emb.failures)} images could not be read and are left out of the comparison")
    labels = cmp.image_labels(emb.paths, request.labels_csv, emb.metadata.get("root"))
    if request.probe or auto:
        from gpl_cli.analysis.probe import check_labels

        check_labels(labels, request.probe, auto, request.folds)
    gem = None
    if auto:
        from gpl_cli.analysis import gem_auto

        gem = gem_auto.choose_p({p: emb.vectors[k] for p, k in zip(gem_auto.GRID, gem_auto.grid_keys())}, labels,
                                request.folds)
        chosen = gem_auto.grid_keys()[gem_auto.GRID.index(gem.best_p)]
        keys = [*keys, *([chosen] if chosen not in keys else [])]
    report = cmp.compare(emb, labels, keys=keys, pool_seconds=pool_seconds, source=source, on_progress=on_progress)
    report.gem_auto = gem
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


def _embed(request: CompareRequest, pools: list[str], auto: bool, on_progress, on_failure):
    """The images embedded once with every pooling: (embeddings, keys compared, pooling seconds, map source)."""
    from gpl_cli.analysis.gem_auto import grid_keys
    from gpl_cli.embedding.config import EmbedConfig
    from gpl_cli.embedding.inputs import collect_inputs

    asked = pools or ([] if auto else list(COMPARE_POOLS))
    config = EmbedConfig(backbone=request.backbone, weights=request.weights, pools=tuple(asked),
                         normalize=request.normalize)
    keys = [s.key for s in config.pool_specs()] if asked else []  # a bad --pool fails before any loading
    if auto:
        config.pools = (*keys, *(k for k in grid_keys() if k not in keys))
    save = Output.resolve(request.save, keys=config.pools, overwrite=request.overwrite) if request.save else None
    items = collect_inputs(request.inputs, nul_separated=request.nul)
    if save:
        save.check([it.path for it in items.items])
    early = cmp.image_labels([it.name for it in items.items], request.labels_csv, items.root)  # before the model
    if request.probe or auto:
        from gpl_cli.analysis.probe import check_labels

        check_labels(early, request.probe, auto, request.folds)
    loaded = maps_from = None
    if request.probe:
        from gpl_cli.analysis.probe import MapSource
        from gpl_cli.models.backbones import load_backbone

        loaded = load_backbone(config.backbone, config.weights)  # shared by both forward passes
        maps_from = MapSource(config, loaded, items.items, request.options)
    emb, summary = cmp.embed_images(config, items, request.options, save, backbone=loaded, on_progress=on_progress,
                                    on_failure=on_failure)
    return emb, keys, summary.pool_seconds, maps_from
