"""Progress bars on stderr (tqdm), silent when disabled or when stderr is not a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm


@contextmanager
def progress_bar(total_bytes: int, description: str, enabled: bool = True) -> Iterator[tqdm]:
    """A bytes progress bar (shows B/s); ``enabled=False`` gives a bar that prints nothing."""
    bar = tqdm(
        total=total_bytes, desc=description, unit="B", unit_scale=True, unit_divisor=1024,
        disable=not enabled or not sys.stderr.isatty(), file=sys.stderr, leave=False,
    )
    try:
        yield bar
    finally:
        bar.close()
