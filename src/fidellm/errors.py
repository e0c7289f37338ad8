"""One exception type for every user-facing failure: the CLI prints its message, never a traceback."""


class FidelError(Exception):
    """A problem with the user's input or environment, stated so the user can fix it.

    The message names the file, line and field involved wherever one is known.
    """
