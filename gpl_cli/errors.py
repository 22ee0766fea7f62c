"""The one exception type the CLI turns into a clean message, and the exit statuses of every command."""

# Exit statuses, the same for every command (README: "Exit codes").
EXIT_OK = 0
EXIT_FAILURE = 1  # an unexpected error (a bug): the traceback is shown
EXIT_USAGE = 2  # bad options, missing inputs, unreadable files, weights not available
EXIT_SOME_FAILED = 3  # the run finished but some inputs could not be embedded
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as a shell reports it)
EXIT_TERMINATED = 143  # SIGTERM (128 + SIGTERM)
EXIT_BROKEN_PIPE = 141  # the reader of stdout went away (128 + SIGPIPE, as a shell reports it)


def missing(what: str, packages: str, extra: str) -> str:
    """The one wording for an optional dependency that is not installed. gpl itself is not on PyPI, so its
    extras install only from a clone; the packages themselves install anywhere."""
    return f"{what}, which is not installed: pip install {packages}  (in a clone of gpl: pip install -e '.[{extra}]')"


class GplError(Exception):
    """An error the user can fix; its message is shown without a traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


class OutputClosed(Exception):
    """The reader of stdout went away (`gpl ... | head -1`): stop quietly with EXIT_BROKEN_PIPE."""
