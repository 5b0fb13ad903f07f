"""The one exception type library callers see.

Every user-facing failure (bad file, bad checkpoint, bad argument) is raised as
``HalfbyteError`` with a one-line message that names the file and the problem.
The CLI prints it as ``halfbyte: error: <message>`` and exits non-zero.
"""

from __future__ import annotations

import os


class HalfbyteError(ValueError):
    """A clean, user-facing error: one line, names the file and the cause.

    A ``ValueError``, so callers that already catch bad-argument errors catch these too."""


def file_error(path: str | os.PathLike, reason: str) -> HalfbyteError:
    """Build the error for a problem in ``path``: ``"<path>: <reason>"``."""
    return HalfbyteError(f"{os.fspath(path)}: {reason}")


class TerminatedBySignal(KeyboardInterrupt):
    """A termination signal (SIGTERM, SIGHUP, SIGQUIT) turned into an exception, so that the same
    clean-up as for Ctrl-C runs (no partial output file); the CLI exits with 128 + ``signum``.

    Raised by the handlers ``engine.gguf_file.GGUFWriter`` installs while it has a partial file. A
    ``KeyboardInterrupt`` subclass: it passes through ``except Exception`` like Ctrl-C does."""

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = int(signum)
        try:
            self.signal_name = signal.Signals(signum).name
        except ValueError:
            self.signal_name = f"signal {signum}"
        super().__init__(f"terminated by {self.signal_name}")
