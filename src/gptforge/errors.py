"""The project's error types: bad input from the user (a flag, a file, a request, a config), and a
failure of the system under us (a full disk) that is nobody's input.

The command line turns either into one line on stderr, exit code 2 for the user's input and 1 for
the system's; anything else is a bug and keeps its traceback. GptforgeError subclasses ValueError
so `except ValueError` in callers keeps working."""

from __future__ import annotations

import errno

# OS errors about a path the user chose (exit 2); any other (a full disk, an I/O error) is the system's (exit 1).
USER_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EACCES, errno.EPERM,
                         errno.EROFS, errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTEMPTY})
_HINTS = {errno.ENOSPC: "free some space on that disk or write elsewhere",
          errno.EDQUOT: "free some space within your disk quota or write elsewhere",
          errno.EROFS: "the disk is read-only; write elsewhere"}


class GptforgeError(ValueError):
    """Something the user asked for is wrong: the message says what and how to fix it."""


class SystemFailure(RuntimeError):
    """The system failed a run (a disk filled up, an I/O error), not the user's input: the message
    says what failed and what was kept. The command line prints it in one line, exit code 1."""


def os_error_message(err: OSError) -> str:
    """One line for an OSError: the path, the reason and, for a full disk, what to do."""
    reason = err.strerror or str(err)
    paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    hint = _HINTS.get(err.errno)
    return f"{paths + ': ' if paths else ''}{reason}{'; ' + hint if hint else ''}"
