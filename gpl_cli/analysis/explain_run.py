"""`gpl explain` from start to end: the images through the Job's embedder, the decompositions
(gpl_cli.analysis.explain), the figure (gpl_cli.report.explain_figure) and the optional JSON, every output
checked before the model loads and written whole or not at all."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from gpl_cli.errors import GplError
from gpl_cli.store.output import FIGURE, JSON, Output


@dataclass
class ExplainResult:
    done: list  # analysis.explain.ImageExplanation, one per image explained
    failures: list  # embedding.images.Failure
    pair: list | None  # analysis.explain.PairTerm per pooling, with two images compared
    figure: str
    pixels: tuple[int, int]
    json_text: str | None = None  # the JSON, when it goes to stdout
    notes: list[str] = field(default_factory=list)


def run_explain(images: list[str], figure: str, config, each: bool = False, classes: int = 3,
                json_path: str | None = None, dpi: int = 100, device: str = "auto",
                overwrite: bool = False) -> ExplainResult:
    """Explain `images` with the backbone and poolings of `config` (an EmbedConfig) into `figure`."""
    from gpl_cli.embedding.config import RunOptions

    outputs = [Output.resolve(figure, kind=FIGURE, overwrite=overwrite)]
    if json_path:
        outputs.append(Output.resolve(json_path, kind=JSON, overwrite=overwrite))
    for out in outputs:
        out.check(images)
    config.check()  # a bad --pool fails before the model loads
    mode = "pair" if len(images) == 2 and not each else "one" if len(images) == 1 else "each"

    from gpl_cli.analysis.explain import explain_files, explain_pair, explanation_json
    from gpl_cli.embedding.job import Job
    from gpl_cli.models.heads import classifier_head
    from gpl_cli.report.explain_figure import draw_images, draw_pair, figure_pixels
    from gpl_cli.report.plots import save_figure

    embedder = Job(config, RunOptions(device=device), len(images)).embedder
    head, notes = None, []
    if classes:
        try:
            head = classifier_head(embedder.backbone)
        except GplError as exc:
            notes.append(f"note: no CAM panels: {exc}")
    done, failures = explain_files(embedder, list(images), head, classes)
    if failures and mode != "each":  # one line: the image, or the pair, cannot be explained
        reasons = "; ".join(f"{f.path}: {f.reason}" for f in failures)
        raise GplError(f"cannot explain {reasons}" if mode == "one" else f"nothing to compare: {reasons}")
    if not done:
        raise GplError("no image could be read")
    pair = explain_pair(*done) if mode == "pair" else None
    fig = draw_pair(*done, pair, config.backbone) if pair else draw_images(done, config.backbone)
    rows, columns = fig.axes[0].get_gridspec().get_geometry()
    width, height = figure_pixels(rows, columns, dpi)
    json_text = None
    if json_path:
        meta = {"backbone": config.backbone, "weights_sha256": embedder.backbone.weights_sha256, "mode": mode,
                "poolings": [s.key for s in embedder.specs], "figure": figure,
                "panels": {"rows": rows, "columns": columns}, "figure_pixels": [width, height]}
        json_text = json.dumps(explanation_json(done, pair, failures, meta), indent=1)
    save_figure(fig, outputs[0], dpi)
    if json_text is not None and not outputs[1].to_stdout:
        with outputs[1].open("w", encoding="utf-8") as f:
            f.write(json_text + "\n")
        json_text = None
    return ExplainResult(done, failures, pair, figure, (width, height), json_text, notes)
