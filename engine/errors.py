"""The one exception type library callers see.

Every user-facing failure (bad file, bad checkpoint, bad argument) is raised as
``HalfbyteError`` with a one-line message that names the file and the problem.
The CLI prints it as ``halfbyte: error: <message>`` and exits non-zero.
"""

from __future__ import annotations

import os


class HalfbyteError(Exception):
    """A clean, user-facing error: one line, names the file and the cause."""


def file_error(path: str | os.PathLike, reason: str) -> HalfbyteError:
    """Build the error for a problem in ``path``: ``"<path>: <reason>"``."""
    return HalfbyteError(f"{os.fspath(path)}: {reason}")
