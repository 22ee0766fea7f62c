"""What the command line shows on stderr: `gpl: ...` lines, the library's log records, progress bars.

stdout carries data only; everything here goes to stderr.
"""

from __future__ import annotations

import logging
import os
import sys

import click


def err(message: str) -> None:
    click.echo(message, err=True)


def say(message: str) -> None:
    """A line on stderr that leaves any progress bar intact."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def note(text: str) -> None:
    """The library's on_note: one `gpl: ...` line."""
    say(f"gpl: {text}")


def skipped(failure) -> None:
    """The library's on_failure: one line per image that could not be embedded."""
    say(f"gpl: skipped {failure.path}: {failure.reason}")


class _LogLines(logging.Handler):
    """gpl_cli's log records (library notes and warnings) as `gpl: ...` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        kind = "warning: " if record.levelno >= logging.WARNING else ""
        say(f"gpl: {kind}{record.getMessage()}")


def show_library_logs(notes: bool = True) -> None:
    """Show gpl_cli's log records on stderr: warnings always, notes (INFO) unless `notes` is False (-q)."""
    logger = logging.getLogger("gpl_cli")
    if not any(isinstance(h, _LogLines) for h in logger.handlers):
        logger.addHandler(_LogLines())
        logger.propagate = False
    logger.setLevel(logging.INFO if notes else logging.WARNING)


class Bars:
    """The library's on_progress(label, done, total) as tqdm bars on stderr, one per label.

    The "embed" bar stays on screen when done, as the run's record; other passes ("ranking avg")
    are transient and titled by their label. Used as a context manager, every bar is closed at the end.
    """

    def __init__(self, quiet: bool = False):
        self.bars = {}
        # A bar redrawn with carriage returns is noise in a log file or a pipe: bars only on a terminal.
        self.quiet = quiet or not sys.stderr.isatty()

    @property
    def callback(self):
        """What to pass as on_progress: None when quiet or when stderr is not a terminal."""
        return None if self.quiet else self

    def __call__(self, label: str, done: int, total: int) -> None:
        bar = self.bars.get(label)
        if bar is None:
            from tqdm import tqdm

            lasting = label == "embed"
            bar = self.bars[label] = tqdm(total=total, initial=done, desc=None if lasting else f"gpl: {label}",
                                          unit="img", file=sys.stderr, leave=lasting, dynamic_ncols=lasting)
        bar.update(done - bar.n)
        if done >= total:
            self.close(label)

    def close(self, label: str | None = None) -> None:
        for key in [label] if label else list(self.bars):
            bar = self.bars.pop(key, None)
            if bar is not None:
                bar.close()

    def __enter__(self) -> Bars:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def report_stdout_failures() -> None:
    """Make a write to stdout that the system refuses (a full disk, an I/O error) one `gpl: error:` line
    naming standard output, as a file's failed write is (gpl_cli.atomic.write_failed), instead of a traceback."""
    from gpl_cli.atomic import ReportingFile
    from gpl_cli.store.sink import STDOUT_NAME

    if not isinstance(sys.stdout, ReportingFile):
        sys.stdout = ReportingFile(sys.stdout, STDOUT_NAME)


def finish_stdout() -> None:
    """Flush stdout before an error exit; if the system refuses, point it at /dev/null so that the
    interpreter's final flush cannot fail again."""
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - the error being reported already says what went wrong
        quiet_stdout()


def quiet_stdout() -> None:
    """Point fd 1 at /dev/null, so the interpreter's final flush of stdout cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
