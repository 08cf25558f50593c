"""The one exception type users see: a single sentence naming what is wrong."""


class TwintuneError(Exception):
    """A problem with the user's input or environment, explained in one sentence.

    The CLI prints the message (no traceback) and exits non-zero.

    Example:
        >>> raise TwintuneError("recipe key 'method.rank' is unknown; did you mean 'method.r'?")
        Traceback (most recent call last):
        twintune.errors.TwintuneError: recipe key 'method.rank' is unknown; did you mean 'method.r'?
    """


class TwintuneWarning(UserWarning):
    """Something the user should know that does not stop the work (a cache file recomputed, say);
    the CLI prints it as one line, `twintune: warning: ...`."""
