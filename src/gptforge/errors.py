"""The project's own error type: bad input from the user (a flag, a file, a request, a config).

The command line turns it into one line on stderr and exit code 2; anything else is a bug and keeps
its traceback. It subclasses ValueError so `except ValueError` in callers keeps working."""


class GptforgeError(ValueError):
    """Something the user asked for is wrong: the message says what and how to fix it."""


def did_you_mean(name: str, choices) -> str:
    """'; did you mean X?' when `name` is close to one of `choices` (a typo), else ''."""
    import difflib

    close = difflib.get_close_matches(str(name).lower(), [str(c) for c in choices], n=1, cutoff=0.75)
    return f"; did you mean {close[0]}?" if close else ""
