"""`gpl embed` end to end: the inputs collected and the output checked against them (torch-free, so a bad
output is refused in a fraction of a second), then one Job written into the output."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from gpl_cli.embedding.config import EmbedConfig, RunMode, RunOptions
from gpl_cli.embedding.inputs import collect_inputs
from gpl_cli.embedding.sources import SourceOptions
from gpl_cli.store.output import Output

if TYPE_CHECKING:
    from gpl_cli.embedding.engine import Summary
    from gpl_cli.embedding.images import Failure


def embed_into(output: Output, inputs: list[str], config: EmbedConfig, options: RunOptions | None = None,
               mode: RunMode | None = None, *, nul: bool = False, strict: bool = False,
               sources: SourceOptions | None = None,
               on_progress: Callable[[str, int, int], None] | None = None,
               on_failure: Callable[[Failure], None] | None = None,
               on_note: Callable[[str], None] = lambda text: None) -> Summary:
    """Embed `inputs` (files, folders, tar shards, parquet files, "-" for a list on stdin) into `output`;
    `sources`: how tar shards and parquet files are read."""
    mode = mode or RunMode()
    options = options or RunOptions()
    options.check(config)  # what the machine can hold, before the inputs are walked or torch loads
    listed = collect_inputs(inputs, nul_separated=nul, sources=sources)
    if listed.duplicates:
        on_note(f"warning: {len(listed.duplicates)} duplicate input(s) embedded once (first: {listed.duplicates[0]})")
    if listed.no_image:
        on_note(f"{len(listed.no_image)} sample(s) hold no image and are left out, not failures "
                f"(first: {listed.no_image[0]})")
    # --resume and --update replace their own output; an unfinished run's journal is judged when opened.
    output.check([*(it.path for it in listed.items if it.source is None), *listed.containers],
                 replacing=mode.resume or mode.update or output.unfinished())
    from gpl_cli.embedding.job import Job  # torch: after every check that needs none

    job = Job(config, options, len(listed.items), strict=strict, on_progress=on_progress, on_failure=on_failure)
    return job.write(listed, output, mode)
