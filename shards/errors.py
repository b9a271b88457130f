"""The one exception type that means "the user asked for something we cannot do"."""


class UserError(Exception):
    """A mistake in input, configuration or environment.

    The CLI prints it as one line and exits 2; it never becomes a traceback.
    """
