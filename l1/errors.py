"""The one exception type that means "the user must change something"."""


class L1Error(Exception):
    """A user-facing error: the scripts print its message as one line and exit non-zero.

    Raise it for bad input (flags, files, corpora, checkpoints), never for bugs: bugs keep
    their traceback.
    """
