"""Errors that end start-up with a one-line message instead of a traceback."""


class StartupError(Exception):
    """A configuration or plugin problem; the CLI prints it and exits with status 2."""
