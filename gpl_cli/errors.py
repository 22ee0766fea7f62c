"""The one exception type the CLI turns into a clean message and an exit status."""

# Exit statuses, documented in the README.
EXIT_OK = 0
EXIT_FAILURE = 1  # an unexpected error
EXIT_USAGE = 2  # bad options, missing inputs, weights not available
EXIT_SOME_FAILED = 3  # the run finished but some inputs could not be embedded


class GplError(Exception):
    """An error the user can fix; its message is shown without a traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code
