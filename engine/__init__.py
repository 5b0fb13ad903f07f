"""halfbyte's engine: GGUF files, kernels, tokenizers, sampling and generation.

    from engine import Model
    model = Model.load("model.gguf")
"""

from __future__ import annotations

from typing import Any

__all__ = ["Model", "GenerationStats"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `halfbyte --help` and `import engine.errors` stay fast (no numba import).
    if name in __all__:
        from engine import model

        return getattr(model, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
