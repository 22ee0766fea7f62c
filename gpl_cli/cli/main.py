"""The `gpl` group, its commands, and the console entry point (user errors -> one line and an exit status).

Commands live one family per module and import their library lazily, so `gpl --help` stays fast.
"""

from __future__ import annotations

import sys

import click

from gpl_cli.cli import compare, console, embed, explain, files, models, search
from gpl_cli.embedding.runtime import tune_process
from gpl_cli.errors import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, GplError, OutputClosed
from gpl_cli.version import __version__


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # click would swallow it with exit status 1; gpl gives it its own status.
            raise OutputClosed() from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="gpl")
def cli() -> None:
    """gpl - Global Pooling Layer: image embeddings from CNN feature maps.

    \b
    Examples:
      gpl embed photos/ -o photos.h5
      gpl embed photos/ -o photos.h5 --pool avg --pool max --normalize l2
      find photos -name '*.jpg' -print0 | gpl embed - -0 -o - | head -1
      gpl info photos.h5
      gpl classify photos/cat.jpg -k 3
      gpl neighbors photos.h5 photos/cat.jpg -k 5
      gpl neighbors photos.h5 --duplicates --threshold 0.95
      gpl export photos.h5 --format parquet -o photos_parquet
      gpl explain photo.jpg -o explain.png

    \b
    Exit status: 0 ok, 1 internal error, 2 usage or input error, 3 some images failed,
    130 interrupted (Ctrl-C), 141 the reader of stdout went away, 143 terminated (SIGTERM).
    Shell completion (bash): eval "$(_GPL_COMPLETE=bash_source gpl)"
    """
    console.show_library_logs()


for command in (embed.embed, embed.classify, files.info, search.neighbors, files.export_command, compare.compare,
                explain.explain, files.pools, files.whiten, models.models, models.tune):
    cli.add_command(command)


def main() -> None:
    """Console entry point: user errors become one line on stderr and an exit status.

    The statuses are listed in gpl_cli.errors and the README ("Exit codes").
    """
    tune_process()  # before any command imports torch
    console.report_stdout_failures()
    try:
        cli.main(prog_name="gpl", standalone_mode=False)  # also under python -m gpl_cli: usage and _GPL_COMPLETE
        sys.stdout.flush()  # the last lines' failure, if any, is reported here rather than at exit
    except GplError as exc:
        console.finish_stdout()
        interrupted = exc.exit_code in (EXIT_INTERRUPTED, EXIT_TERMINATED)
        console.err(f"gpl: {exc}" if interrupted else f"gpl: error: {exc}")
        sys.exit(exc.exit_code)
    except OutputClosed:
        console.quiet_stdout()
        sys.exit(EXIT_BROKEN_PIPE)
    except (click.exceptions.Abort, KeyboardInterrupt):
        console.err("gpl: interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    sys.exit(EXIT_OK)
