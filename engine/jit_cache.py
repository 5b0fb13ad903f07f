"""Knowing whether Numba's on-disk kernel cache is warm, to say "compiling kernels" only when it is not.

Numba keeps compiled kernels (``cache=True``) in ``__pycache__`` beside each module, or in
a user cache directory when the package directory is read-only. A marker file, keyed by
the kernels' source, Numba and Python versions and the CPU, records that a full run
completed, i.e. that the cache now holds what a run needs.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path

KERNEL_DIR = Path(__file__).parent / "kernels"


def _marker() -> Path:
    import numba

    digest = hashlib.sha256()
    for path in sorted(KERNEL_DIR.glob("*.py")):
        digest.update(path.read_bytes())
    digest.update(f"{numba.__version__} {sys.version} {platform.machine()} {platform.processor()}".encode())
    # Each installation (a checkout, each venv's site-packages) has its own Numba cache beside its
    # modules, so its own marker: a warm checkout says nothing about a fresh `pip install .`.
    digest.update(str(KERNEL_DIR.resolve()).encode())
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "halfbyte"
    return base / f"kernels-{digest.hexdigest()[:16]}.warm"


def is_warm() -> bool:
    try:
        return _marker().exists()
    except OSError:
        return False


def mark_warm() -> None:
    try:
        marker = _marker()
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:
        pass  # no writable cache dir: we just say "compiling" again next time
