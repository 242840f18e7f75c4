"""One exception type for user-facing errors: the CLI prints its message on one line and exits 2."""


class MacqError(ValueError):
    """Bad input or an unsupported request; the message names the argument and what was expected."""
