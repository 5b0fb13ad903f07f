"""The demo model that ships inside the package, so `halfbyte run -p "..."` works offline.

A 7.7M-parameter LLaMA (GQA, 4096-piece SentencePiece vocabulary) trained on the King James
Bible by bench/demo_model/train.py and converted to Q8_0 with `halfbyte convert`.
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import HalfbyteError

DATA_DIR = Path(__file__).parent / "data"
DEMO_MODEL_NAME = "demo-kjv-q8_0.gguf"


def default_model_path() -> Path:
    path = DATA_DIR / DEMO_MODEL_NAME
    if not path.is_file():
        raise HalfbyteError(f"{path}: the embedded demo model is missing from this installation; "
                            "give a model file (halfbyte run MODEL.gguf -p ...)")
    return path
