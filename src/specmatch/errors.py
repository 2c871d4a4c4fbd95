"""The one exception type a stage raises for bad input: the CLI prints it without a traceback."""


class SpecmatchError(Exception):
    """A user-facing error: the message names the file, the key or the parameter, and what was
    expected. Raised for bad input; bugs stay ordinary exceptions with their traceback."""
